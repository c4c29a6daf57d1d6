from fsapp.cli.main import main

main()
