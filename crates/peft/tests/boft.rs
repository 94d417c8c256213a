//! boft parity with PEFT 0.21.2 (fixtures/boft/). Filled in by the method's parity tests.
