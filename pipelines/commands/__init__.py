"""One module per ``clipcap`` sub-command: ``add_parser(subparsers)`` + a ``run(args)`` calling the library."""
