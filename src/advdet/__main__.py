from advdet.cli import main

main()
