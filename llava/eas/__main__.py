import sys

from llava.eas.train import main
from mmprune.base.entry import run_main

sys.exit(run_main(main))
