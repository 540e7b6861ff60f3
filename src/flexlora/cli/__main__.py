import sys

from flexlora.cli import main

sys.exit(main())
