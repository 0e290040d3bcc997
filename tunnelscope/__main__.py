from tunnelscope.cli import main

main()
