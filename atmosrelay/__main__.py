import sys

from atmosrelay.cli import main

sys.exit(main())
