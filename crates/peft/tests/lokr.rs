//! lokr parity with PEFT 0.21.2 (fixtures/lokr/). Filled in by the method's parity tests.
