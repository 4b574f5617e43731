"""Meta-train with distmeta. `python launch.py` runs the default job (MAML, sinusoid regression,
embedded local Ray); `python launch.py --help` lists the options."""

import sys

from distmeta.cli import launch_main

if __name__ == "__main__":
    sys.exit(launch_main())
