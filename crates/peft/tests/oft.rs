//! oft parity with PEFT 0.21.2 (fixtures/oft/). Filled in by the method's parity tests.
