//! Generation loop.
