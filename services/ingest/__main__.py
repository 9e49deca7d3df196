print("ingest main")
