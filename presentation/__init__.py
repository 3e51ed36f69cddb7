"""What Sieve shows people: the CLI's run tables and JSON, progress on the terminal, the run's
HTML report and its figures. Imports storage and estimators, never flows or tasks; whatever
comes from a flow (its summary, the config) is passed in as a value."""
