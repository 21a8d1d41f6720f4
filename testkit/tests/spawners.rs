//! The spawners start real servers and leave nothing behind on Drop.

use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use testkit::{Etcd, Postgres};

fn port_open(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[test]
fn postgres_starts_as_unprivileged_user_and_stops_on_drop() {
    let pg = Postgres::start(&[("max_connections", "20")]).expect("start postgres");
    assert_eq!(pg.psql("select 1").expect("psql"), "1");
    assert_eq!(pg.psql("show max_connections").expect("psql"), "20");
    assert_eq!(pg.psql("show fsync").expect("psql"), "off");
    assert!(pg.port() < 32768);
    let owner = std::fs::metadata(pg.data_dir()).expect("stat").uid();
    if nix::unistd::Uid::effective().is_root() {
        assert_ne!(owner, 0, "data dir must belong to the postgres user");
    }
    let (port, dir) = (pg.port(), pg.data_dir());
    drop(pg);
    assert!(!port_open(port), "postgres still listening after drop");
    assert!(!dir.exists(), "temp dir left behind");
}

#[test]
fn etcd_restarts_with_its_data_and_stops_on_drop() {
    let mut etcd = Etcd::start().expect("start etcd");
    assert!(etcd.healthy());
    let port = etcd.client_port();
    etcd.stop();
    assert!(!port_open(port));
    etcd.restart().expect("restart");
    assert!(etcd.healthy());
    etcd.freeze().expect("freeze");
    assert!(!etcd.healthy(), "a frozen etcd does not answer");
    etcd.thaw().expect("thaw");
    assert!(etcd.healthy());
    drop(etcd);
    assert!(!port_open(port), "etcd still listening after drop");
}
