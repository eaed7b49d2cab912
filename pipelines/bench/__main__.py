from pipelines.bench import main

if __name__ == "__main__":  # vLLM's engine core is a spawned process, which imports this module again
    main()
