"""Load tests of the UniMatch service: the Locust workload (locustfile.py) and its headless runner (run.py)."""
