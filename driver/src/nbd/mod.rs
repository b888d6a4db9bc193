//! NBD (NBD.md): the wire layer ([`proto`]), shared by the server front end of `ballot serve`
//! and the `nbd` client driver.

pub mod client;
pub mod proto;
pub mod server;
