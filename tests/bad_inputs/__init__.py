"""The bad-input corpus: hostile or careless inputs to every command, each with its expected
outcome (tests/test_bad_inputs.py runs them; README "Guarantees")."""
