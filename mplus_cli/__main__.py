from mplus_cli.app import main

main()
