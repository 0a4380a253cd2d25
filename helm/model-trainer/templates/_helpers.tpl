{{/* The chart's name, or nameOverride. */}}
{{- define "model-trainer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's base name: fullnameOverride, else the release name where it already holds the
chart's name, else "<release>-<chart>". Names of objects append a component to it.
*/}}
{{- define "model-trainer.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
"<fullname>-<suffix>", with the base name shortened so that the whole stays a valid Service name
(63 characters). Call with (list . "suffix").
*/}}
{{- define "model-trainer.componentName" -}}
{{- $root := index . 0 -}}
{{- $suffix := index . 1 -}}
{{- $base := include "model-trainer.fullname" $root | trunc (int (sub 62 (len $suffix))) | trimSuffix "-" -}}
{{- printf "%s-%s" $base $suffix }}
{{- end }}

{{- define "model-trainer.operatorName" -}}
{{- include "model-trainer.componentName" (list . "operator") }}
{{- end }}

{{- define "model-trainer.operatorServiceAccount" -}}
{{- default (include "model-trainer.operatorName" .) .Values.operator.serviceAccount.name }}
{{- end }}

{{- define "model-trainer.redisName" -}}
{{- include "model-trainer.componentName" (list . "redis") }}
{{- end }}

{{- define "model-trainer.artifactServiceName" -}}
{{- include "model-trainer.componentName" (list . "artifacts") }}
{{- end }}

{{- define "model-trainer.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select one component's pods. Call with (list . "component"). */}}
{{- define "model-trainer.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "model-trainer.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Every label of one component's objects. Call with (list . "component"). */}}
{{- define "model-trainer.labels" -}}
{{- $root := index . 0 -}}
helm.sh/chart: {{ include "model-trainer.chart" $root }}
{{ include "model-trainer.selectorLabels" . }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: model-trainer
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
{{- end }}

{{/*
An image reference from {repository, tag, digest}: the digest wins over the tag, and the tag
defaults to the chart's appVersion. Call with (list . .Values.image).
*/}}
{{- define "model-trainer.image" -}}
{{- $root := index . 0 -}}
{{- $image := index . 1 -}}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag | toString) }}
{{- end }}
{{- end }}

{{/* The artifacts PersistentVolumeClaim: the user's own, or the one this chart makes. */}}
{{- define "model-trainer.artifactsClaim" -}}
{{- default .Values.artifacts.claimName .Values.artifacts.existingClaim }}
{{- end }}

{{/* The Secret whose `password` key holds the Redis password; empty if Redis has none. */}}
{{- define "model-trainer.redisPasswordSecret" -}}
{{- if .Values.redis.enabled }}
{{- default (include "model-trainer.redisName" .) .Values.redis.auth.existingSecret }}
{{- else }}
{{- .Values.redis.external.existingSecret }}
{{- end }}
{{- end }}

{{/*
Redis as the operator and the trainer pods reach it. Trainer pods run in the jobs' namespaces,
so the chart's own Redis goes by its fully qualified Service name.
*/}}
{{- define "model-trainer.redisUrl" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s.%s.svc.%s:6379/0" (include "model-trainer.redisName" .) .Release.Namespace .Values.clusterDomain }}
{{- else }}
{{- required "redis.external.url is required when redis.enabled is false" .Values.redis.external.url }}
{{- end }}
{{- end }}

{{/* The artifact service's token Secret (key `token`). */}}
{{- define "model-trainer.artifactTokenSecret" -}}
{{- default (include "model-trainer.componentName" (list . "artifacts-token")) .Values.artifactService.auth.existingSecret }}
{{- end }}

{{/*
A value of a generated Secret: the given one, else the one already in the cluster (so that an
upgrade keeps it), else a new random one. `helm template` (and so Argo CD) cannot look up, and
makes a new one every time. Call with (list . secretName key given).
*/}}
{{- define "model-trainer.secretValue" -}}
{{- $root := index . 0 -}}
{{- $name := index . 1 -}}
{{- $key := index . 2 -}}
{{- $given := index . 3 -}}
{{- if $given }}
{{- $given }}
{{- else }}
{{- $existing := lookup "v1" "Secret" $root.Release.Namespace $name -}}
{{- $data := dig "data" $key "" ($existing | default dict) -}}
{{- if $data }}
{{- $data | b64dec }}
{{- else }}
{{- randAlphaNum 32 }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Restricted Pod Security Standard settings of a container; the pod sets runAsUser and seccomp.
*/}}
{{- define "model-trainer.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* A pod's securityContext for a uid and gid. Call with (int uid). */}}
{{- define "model-trainer.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ . }}
runAsGroup: {{ . }}
fsGroup: {{ . }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* nodeSelector, tolerations, affinity and imagePullSecrets of a pod. Call with (list . .Values.x). */}}
{{- define "model-trainer.scheduling" -}}
{{- $root := index . 0 -}}
{{- $values := index . 1 -}}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end }}

{{/* Compute resources with every quantity as a string, as the operator's settings want them. */}}
{{- define "model-trainer.stringResources" -}}
{{- $out := dict -}}
{{- range $kind, $quantities := . }}
{{- $strings := dict -}}
{{- range $resource, $quantity := $quantities }}
{{- $_ := set $strings $resource (toString $quantity) }}
{{- end }}
{{- $_ := set $out $kind $strings }}
{{- end }}
{{- toJson $out }}
{{- end }}
