from clusterd.cli import main

main()
