from calciscope.cli import main

main()
