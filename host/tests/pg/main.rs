//! Process-group tests: shared scenarios against both backends, plus TCP-specific ones
//! (authentication of strangers, floods, poisoning, stash limit and cost).

mod alloc_count;
mod formation;
mod inproc;
mod scenarios;
mod stash_cost;
mod tcp;

#[global_allocator]
static ALLOCATOR: alloc_count::Counting = alloc_count::Counting;
