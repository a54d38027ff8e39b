import sys

from vattn.bench.cli import main

sys.exit(main())
