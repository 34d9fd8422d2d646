import sys

from fsae.cli import main

sys.exit(main())
