import sys

from distmeta.cli import main

sys.exit(main())
