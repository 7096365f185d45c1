//! Process-group tests: shared scenarios against both backends, plus TCP-specific ones
//! (authentication of strangers, poisoning, stash limit).

mod inproc;
mod scenarios;
mod tcp;
