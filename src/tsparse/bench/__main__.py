from tsparse.bench.cli import main

main()
