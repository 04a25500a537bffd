"""The target of tests/test_tracking.py's store-creation race: a module light enough that each
spawned process imports only it and the tracking package, not the test module's torch."""
from cameo_bench import tracking


def create_store(uri, barrier, results):
    barrier.wait()  # every process reaches the empty folder together
    try:
        tracking.ensure_store(uri)
        tracking.get_or_create_experiment("race", uri)
        results.put("ok")
    except Exception as err:  # noqa: BLE001 - the error's name is the result
        results.put(f"{type(err).__name__}: {err}")
