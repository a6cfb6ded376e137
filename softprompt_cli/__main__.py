from softprompt_cli.cli import main

main()
