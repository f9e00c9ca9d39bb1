"""`make demo`: see unkey_deploy.dev.demo."""

from unkey_deploy.dev.demo import main

raise SystemExit(main())
