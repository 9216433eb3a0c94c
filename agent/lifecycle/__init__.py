"""What is installed and what serves: engine store, deploy, verify, canary, revert, rollback."""
