//! Rules of the FP32 -> FP16 pass, checked on small hand-built graphs: which nodes are
//! converted or kept in FP32 (and why), where Casts go, what happens to initializers,
//! constants, declared types and control-flow subgraphs.
//!
//! Every converted graph also goes through `check_graph`, which fails the test when a node
//! reads a value before it is produced, when operands that must share a type do not, or when
//! a declared type (graph input/output, value_info, subgraph input/output) disagrees with the
//! value it describes. This is pure graph rewriting: numerical checks live elsewhere.
//!
//! Helpers: `build` (graphs and tensors), `run` (running the pass), `inspect` (reading the
//! result) and `well_formed` (the checks every converted graph goes through). The other
//! modules hold the tests, by topic.

mod build;
mod inspect;
mod run;
mod well_formed;

mod block_lists;
mod chain;
mod constants;
mod control_flow;
mod edge_cases;
mod graph_interface;
mod initializers;
mod kept_patterns;
mod real_model_regressions;
mod type_boundary_casts;
