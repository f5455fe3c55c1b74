"""One module per ``clipcap`` sub-command: ``add_arguments(parser)`` + a ``run(args)`` calling the library."""
