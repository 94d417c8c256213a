//! loha parity with PEFT 0.21.2 (fixtures/loha/). Filled in by the method's parity tests.
