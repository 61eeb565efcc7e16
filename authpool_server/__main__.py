from authpool_server.cli import main

raise SystemExit(main())
