from lightning_sd.cli import main

main()
