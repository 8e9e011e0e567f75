import sys

if sys.argv[1:2] == ["compare"]:  # python -m bench compare --against COMMIT: two commits on one machine
    from bench.compare import main

    sys.exit(main(sys.argv[2:]))

from bench.run import main

sys.exit(main())
