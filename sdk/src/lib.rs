//! Cloud48 plugin SDK (filled in by the WASM plugin issue).
