"""`python -m authpool_server.simulator`: see `authpool_server.simulator.cli`."""

from authpool_server.simulator.cli import main

raise SystemExit(main())
