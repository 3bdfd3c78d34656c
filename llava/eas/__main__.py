import sys

from llava.eas.train import main
from mmprune.cli import run_main

sys.exit(run_main(main))
