import sys

from sparsekernels.cli import main

sys.exit(main())
