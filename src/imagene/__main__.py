from imagene._cli import main

raise SystemExit(main())
