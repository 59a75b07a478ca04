import sys

from launcher.launch import main

sys.exit(main())
