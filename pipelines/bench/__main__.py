from pipelines.bench import main

main()
