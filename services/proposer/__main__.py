from services.proposer.main import main

main()
