from xnatio.cli.main import main

main()
