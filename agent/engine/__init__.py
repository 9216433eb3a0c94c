"""One engine, verified and isolated: bundles, signatures, device checks, runtimes, worker process."""
