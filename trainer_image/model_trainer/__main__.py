import sys

from model_trainer.cli import main

sys.exit(main())
