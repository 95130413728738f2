from services.evaluator.main import main

main()
