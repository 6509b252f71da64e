print("Hello from NanoGrid")
