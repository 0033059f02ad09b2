from mplus_cli.main import main

main()
