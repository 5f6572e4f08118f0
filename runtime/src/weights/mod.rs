//! Weight loading (filled in by the weights work).
