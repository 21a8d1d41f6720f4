//! Carrying out the plan's actions on the local PostgreSQL. Each action either succeeds or
//! returns an error that stops the rest of the plan; the loop observes and plans again.

use crate::config::slot_name;
use crate::daemon::Keeper;
use crate::layout::{pgpass_line, write_atomic, write_secret, DbState};
use crate::postmaster::Postmaster;
use crate::sql;
use anyhow::{anyhow, bail, Context};
use control::faults::Fault;
use control::keeper::{PgAction, StopMode};
use control::model::{Db, DbInitMode};
use nix::sys::signal::Signal;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

/// Long-running tools (base backup, restore) get this long.
const LONG: Duration = Duration::from_secs(3600);

impl Keeper {
    /// Runs `actions` in order; true if any did something.
    pub(crate) async fn execute(&mut self, actions: Vec<PgAction>) -> bool {
        // A plan that ends waiting (or refusing) is not worth re-planning at once: wait for
        // an event instead of spinning.
        let waits = matches!(
            actions.last(),
            Some(PgAction::Wait(_) | PgAction::Refuse(_))
        );
        if self.instance.reloaded
            && !actions.contains(&PgAction::Reload)
            && matches!(actions.last(), Some(PgAction::Converged(_)))
        {
            tracing::info!("postgres parameters not changed");
            self.instance.reloaded = false;
        }
        let mut acted = false;
        for action in actions {
            let effect = !matches!(
                action,
                PgAction::Wait(_)
                    | PgAction::Refuse(_)
                    | PgAction::Converged(_)
                    | PgAction::SyncSlots
            );
            // Tools run at most LONG (a base backup of a big database): the loop is alive
            // while one runs.
            self.acting(Some(LONG + Duration::from_secs(60)));
            let result = self.act(&action).await;
            self.acting(None);
            self.shared.beat();
            match result {
                Ok(()) => {
                    if effect {
                        tracing::info!(?action, "done");
                    }
                    acted |= effect && !waits;
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    if self.view.problem.as_deref() != Some(msg.as_str()) {
                        tracing::error!(?action, error = %msg, "action failed");
                    }
                    self.view.problem = Some(msg);
                    // Give a failing step a moment before the next attempt.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    return acted;
                }
            }
        }
        acted
    }

    async fn act(&mut self, action: &PgAction) -> anyhow::Result<()> {
        match action {
            PgAction::Fence => {
                tracing::warn!(silence = ?self.store_silence(), "no store contact: fencing the master");
                self.stop_pg(Signal::SIGQUIT).await;
                self.instance.fenced = true;
            }
            PgAction::Unfence => {
                tracing::info!("store contact is back: lifting the fence");
                self.instance.fenced = false;
            }
            PgAction::Stop(mode) => {
                let sig = match mode {
                    StopMode::Fast => Signal::SIGINT,
                    StopMode::Immediate => Signal::SIGQUIT,
                };
                let master = self.instance.postmaster.is_some()
                    && self.instance.state.as_ref().is_some_and(|s| !s.in_recovery);
                self.stop_pg(sig).await;
                if master && *mode == StopMode::Fast {
                    self.report_clean_shutdown().await;
                }
            }
            PgAction::ClearData => self.clear_data().await?,
            PgAction::InitDb => self.init_db().await?,
            PgAction::RestorePitr => self.restore_pitr().await?,
            PgAction::TakeOverExisting => self.take_over()?,
            PgAction::BaseBackup { from_db } => self.base_backup(from_db).await?,
            PgAction::Rewind { from_db } => self.rewind(from_db).await?,
            PgAction::WriteConfig => self.write_config()?,
            PgAction::Start => self.start().await?,
            PgAction::Promote => self.promote().await?,
            PgAction::Reload => {
                // Go stolon's words: operators' log alerts match them.
                tracing::info!("postgres parameters changed, reloading postgres instance");
                self.signal_pg(Signal::SIGHUP)?;
                self.instance.reloaded = true;
            }
            PgAction::Restart => {
                self.stop_pg(Signal::SIGINT).await;
                self.start().await?;
            }
            PgAction::SyncSlots => self.sync_slots().await?,
            PgAction::Converged(generation) => {
                if let Some(db) = self.my_db() {
                    self.view.converged = Some((db.uid.clone(), *generation));
                }
                self.view.problem = None;
            }
            PgAction::Refuse(why) => bail!("{why}"),
            PgAction::Wait(why) => tracing::debug!(%why, "waiting"),
        }
        Ok(())
    }

    /// After a master's fast stop: where its WAL ends, from pg_controldata, published at
    /// once (the rest of the plan, a rewind or a base backup, may take long, and a
    /// switchover's target can be promoted meanwhile). Nothing when the stop was not clean.
    async fn report_clean_shutdown(&mut self) {
        let out = self.controldata().await;
        match out.map(|o| crate::config::parse_shutdown_checkpoint(&o)) {
            Ok(Some(lsn)) => {
                tracing::info!(lsn = %crate::sql::format_lsn(lsn), "master stopped cleanly");
                self.instance.shutdown_checkpoint = Some(lsn);
                self.refresh_info();
            }
            Ok(None) => tracing::warn!("master stopped, but not cleanly shut down"),
            Err(e) => tracing::warn!(error = %e, "pg_controldata failed after the stop"),
        }
    }

    fn db(&self) -> anyhow::Result<Db> {
        self.my_db()
            .cloned()
            .ok_or_else(|| anyhow!("no db assigned"))
    }

    fn signal_pg(&self, sig: Signal) -> anyhow::Result<()> {
        let pm = self
            .instance
            .postmaster
            .as_ref()
            .ok_or_else(|| anyhow!("PostgreSQL is not running"))?;
        pm.signal(sig).context("signal postmaster")
    }

    /// Arms the watchdog for `pid` from the last acknowledged publish (or from now), and
    /// keeps the publisher re-arming it.
    async fn arm_watchdog(&self, pid: Option<i32>) {
        let Some(pid) = pid else { return };
        if self.settings.faults.has(Fault::NoSelfFencing) {
            return;
        }
        *self.shared.arm_pid.lock().expect("lock") = Some(pid);
        let within = self.watchdog_window();
        tracing::debug!(
            pid,
            ?within,
            "fencing watchdog armed before the master runs"
        );
        if let Some(wd) = self.shared.watchdog.lock().await.as_mut() {
            if let Err(e) = wd.arm(pid, within).await {
                tracing::error!(error = %e, "fencing watchdog unreachable");
            }
        }
    }

    /// Stops PostgreSQL (escalating after the timeout) and disarms the watchdog first, so
    /// it never signals a PID the system may reuse.
    pub(crate) async fn stop_pg(&mut self, sig: Signal) {
        *self.shared.arm_pid.lock().expect("lock") = None;
        if let Some(wd) = self.shared.watchdog.lock().await.as_mut() {
            let _ = wd.disarm().await;
        }
        if let Some(mut pm) = self.instance.postmaster.take() {
            pm.stop(sig, Duration::from_secs(30)).await;
        }
        self.instance.forget_observed();
    }

    /// Empties the data directory (mode 0700, owned by the OS user) and forgets its db.
    async fn clear_data(&mut self) -> anyhow::Result<()> {
        let dir = self.settings.layout.pg_data();
        if dir.exists() {
            crate::layout::remove_dir_off_runtime(&dir)
                .await
                .with_context(|| format!("remove {}", dir.display()))?;
        }
        self.settings.layout.set_db_state(None)?;
        self.view.converged = None;
        self.make_private_dir(&dir)
    }

    fn make_private_dir(&self, dir: &Path) -> anyhow::Result<()> {
        crate::layout::create_private_dir(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        self.settings.tools.chown(dir)?;
        Ok(())
    }

    /// The directories and password file the tools need.
    fn prepare_dirs(&self) -> anyhow::Result<()> {
        self.make_private_dir(&self.settings.layout.pg_data())?;
        self.make_private_dir(&self.settings.layout.socket_dir())?;
        let mut pass = String::new();
        if let Some(p) = &self.settings.repl_password {
            pass += &pgpass_line(&self.settings.local.repl_user, p);
        }
        if let Some(p) = &self.settings.su_password {
            pass += &pgpass_line(&self.settings.local.su_user, p);
        }
        let file = self.settings.layout.passfile();
        write_secret(&file, pass.as_bytes())?;
        self.settings.tools.chown(&file)?;
        Ok(())
    }

    async fn init_db(&mut self) -> anyhow::Result<()> {
        let db = self.db()?;
        self.prepare_dirs()?;
        let pwfile = self.settings.layout.dir.join("initdb.pw");
        write_secret(
            &pwfile,
            self.settings
                .su_password
                .clone()
                .unwrap_or_default()
                .as_bytes(),
        )?;
        self.settings.tools.chown(&pwfile)?;
        let data = self.settings.layout.pg_data();
        let mut args: Vec<String> = vec![
            "-D".into(),
            data.display().to_string(),
            "-U".into(),
            self.settings.local.su_user.clone(),
            "--auth=trust".into(),
        ];
        if self.settings.su_password.is_some() {
            args.push(format!("--pwfile={}", pwfile.display()));
        }
        let nc = db.spec.new_config.clone().unwrap_or_default();
        if !nc.locale.is_empty() {
            args.push(format!("--locale={}", nc.locale));
        }
        if !nc.encoding.is_empty() {
            args.push(format!("--encoding={}", nc.encoding));
        }
        if nc.data_checksums {
            args.push("--data-checksums".into());
        }
        let r = self.run_initdb(&args, nc.locale.is_empty()).await;
        let _ = std::fs::remove_file(&pwfile);
        r?;
        self.record_init(&db, false)
    }

    /// initdb; with no locale in the spec, in the keeper's own (as Go stolon), and if the
    /// system lacks that locale, in C.UTF-8 with a warning rather than no cluster at all.
    async fn run_initdb(&self, args: &[String], env_locale: bool) -> anyhow::Result<()> {
        let tools = &self.settings.tools;
        let limit = Duration::from_secs(300);
        if !env_locale {
            tools.run("initdb", args, &[], limit).await?;
            return Ok(());
        }
        let mut with_env = args.to_vec();
        with_env.extend(crate::tools::initdb_locale_args(|k| std::env::var(k).ok()));
        match tools.run("initdb", &with_env, &[], limit).await {
            Err(crate::tools::ToolError::Failed { stderr, .. })
                if stderr.contains("invalid locale name") =>
            {
                tracing::warn!(%stderr, "the keeper's locale is not installed: initdb in C.UTF-8");
                let mut c = args.to_vec();
                c.extend(crate::tools::initdb_locale_args(|_| None));
                tools.run("initdb", &c, &[], limit).await?;
            }
            r => {
                r?;
            }
        }
        Ok(())
    }

    /// Remembers the parameters found in the new data dir and which db it holds.
    fn record_init(&mut self, db: &Db, pitr: bool) -> anyhow::Result<()> {
        let conf = std::fs::read_to_string(self.settings.layout.pg_data().join("postgresql.conf"))
            .unwrap_or_default();
        self.settings
            .layout
            .set_init_params(&crate::config::parse_conf(&conf))?;
        self.settings.layout.set_db_state(Some(&DbState {
            db_uid: db.uid.clone(),
            pitr_pending: pitr,
        }))?;
        Ok(())
    }

    async fn restore_pitr(&mut self) -> anyhow::Result<()> {
        let db = self.db()?;
        let cfg = db.spec.pitr_config.clone().unwrap_or_default();
        if cfg.data_restore_command.is_empty() {
            bail!("initMode pitr without pitrConfig.dataRestoreCommand");
        }
        self.prepare_dirs()?;
        let data = self.settings.layout.pg_data();
        let command = crate::tools::expand_restore_command(
            &cfg.data_restore_command,
            &data.display().to_string(),
        );
        // The restore command is the operator's shell command, run as the OS user with the
        // keeper's environment (a backup tool's credentials), as in Go stolon.
        let mut c = std::process::Command::new("/bin/sh");
        crate::tools::child_env(&mut c);
        c.arg("-c")
            .arg(&command)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if let Some((uid, gid)) = self.settings.tools.os_user {
            std::os::unix::process::CommandExt::uid(&mut c, uid.as_raw());
            std::os::unix::process::CommandExt::gid(&mut c, gid.as_raw());
        }
        let cmd = tokio::process::Command::from(c);
        crate::tools::run_command("dataRestoreCommand", cmd, LONG).await?;
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700))?;
        for f in ["postmaster.pid", "standby.signal", "recovery.signal"] {
            let _ = std::fs::remove_file(data.join(f));
        }
        self.record_init(&db, true)
    }

    fn take_over(&mut self) -> anyhow::Result<()> {
        let db = self.db()?;
        if db.spec.include_previous_config {
            self.record_init(&db, false)
        } else {
            self.settings.layout.set_init_params(&Default::default())?;
            self.settings.layout.set_db_state(Some(&DbState {
                db_uid: db.uid.clone(),
                pitr_pending: false,
            }))?;
            Ok(())
        }
    }

    /// The followed master's address from the cluster view.
    fn upstream(&self, from_db: &str) -> anyhow::Result<(String, u16)> {
        let m = self
            .view
            .cd
            .as_ref()
            .and_then(|cd| cd.dbs.get(from_db))
            .ok_or_else(|| anyhow!("followed db {from_db} is not in the cluster view"))?;
        let port = m
            .status
            .port
            .ok_or_else(|| anyhow!("db {from_db} has no port yet"))?;
        if m.status.listen_address.is_empty() {
            bail!("db {from_db} has no address yet");
        }
        Ok((m.status.listen_address.clone(), port))
    }

    async fn base_backup(&mut self, from_db: &str) -> anyhow::Result<()> {
        let db = self.db()?;
        let (host, port) = self.upstream(from_db)?;
        self.prepare_dirs()?;
        let data = self.settings.layout.pg_data();
        let passfile = self.settings.layout.passfile().display().to_string();
        let mut args = vec![
            "-D".to_string(),
            data.display().to_string(),
            "-h".into(),
            host,
            "-p".into(),
            port.to_string(),
            "-U".into(),
            self.settings.local.repl_user.clone(),
            "-X".into(),
            "stream".into(),
            "--checkpoint=fast".into(),
            "-w".into(),
            format!("--slot={}", slot_name(&db.uid)),
            // The slot exists from the start of the copy, so the standby streams at once
            // (the master's keeper would create it only once the view lists the follower).
            "--create-slot".into(),
        ];
        let started = std::time::Instant::now();
        let env = [("PGPASSFILE", passfile.as_str())];
        let mut r = self
            .settings
            .tools
            .run("pg_basebackup", &args, &env, LONG)
            .await;
        let slot = slot_name(&db.uid);
        if matches!(&r, Err(crate::tools::ToolError::Failed { stderr, .. }) if slot_already_exists(stderr, &slot))
        {
            args.pop();
            let _ = self.clear_data().await;
            self.prepare_dirs()?;
            r = self
                .settings
                .tools
                .run("pg_basebackup", &args, &env, LONG)
                .await;
        }
        if let Err(e) = r {
            // A partial copy must not look like data.
            let _ = self.clear_data().await;
            return Err(e.into());
        }
        tracing::info!(elapsed = ?started.elapsed(), from = %from_db, "base backup done");
        self.settings.layout.set_db_state(Some(&DbState {
            db_uid: db.uid.clone(),
            pitr_pending: false,
        }))?;
        Ok(())
    }

    /// pg_rewind from the followed master; on failure a fresh base backup.
    async fn rewind(&mut self, from_db: &str) -> anyhow::Result<()> {
        let db = self.db()?;
        let (host, port) = self.upstream(from_db)?;
        self.prepare_dirs()?;
        let source = format!(
            "host={host} port={port} user={} dbname=postgres passfile={}",
            self.settings.local.su_user,
            self.settings.layout.passfile().display()
        );
        let args = [
            "-D".to_string(),
            self.settings.layout.pg_data().display().to_string(),
            format!("--source-server={source}"),
        ];
        crate::layout::auto_conf_to_regular(&self.settings.layout.pg_data())?;
        // Make sure the source's control file shows its current timeline (see promote).
        if let Err(e) = self.checkpoint_upstream(&host, port).await {
            tracing::warn!(error = %e, "cannot checkpoint the rewind source");
        }
        match self.settings.tools.run("pg_rewind", &args, &[], LONG).await {
            Ok(_) => {
                tracing::info!(from = %from_db, "pg_rewind done");
                self.settings.layout.set_db_state(Some(&DbState {
                    db_uid: db.uid.clone(),
                    pitr_pending: false,
                }))?;
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "pg_rewind failed: taking a fresh base backup");
                self.clear_data().await?;
                self.base_backup(from_db).await
            }
        }
    }

    async fn checkpoint_upstream(&self, host: &str, port: u16) -> anyhow::Result<()> {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(host)
            .port(port)
            .user(&self.settings.local.su_user)
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(5));
        if let Some(p) = &self.settings.su_password {
            cfg.password(p);
        }
        let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client.batch_execute("CHECKPOINT").await?;
        Ok(())
    }

    /// Writes the rendered files and points postgresql.auto.conf at /dev/null, as Go stolon
    /// does: ALTER SYSTEM then fails with an error (PostgreSQL cannot fsync /dev/null)
    /// instead of a setting that the spec silently overrides.
    fn write_config(&mut self) -> anyhow::Result<()> {
        let r = self
            .rendered()
            .ok_or_else(|| anyhow!("no db to configure"))?;
        let dir = self.settings.layout.pg_data();
        crate::layout::auto_conf_to_dev_null(&dir)?;
        let files = [
            ("postgresql.conf", r.postgresql_conf.as_str()),
            ("pg_hba.conf", r.pg_hba_conf.as_str()),
        ];
        for (name, text) in files {
            let path = dir.join(name);
            write_atomic(&path, text.as_bytes())?;
            self.settings.tools.chown(&path)?;
        }
        for (name, wanted) in [
            ("standby.signal", r.standby_signal),
            ("recovery.signal", r.recovery_signal),
        ] {
            let path = dir.join(name);
            if wanted {
                std::fs::write(&path, b"")?;
                self.settings.tools.chown(&path)?;
            } else {
                let _ = std::fs::remove_file(&path);
            }
        }
        Ok(())
    }

    /// Starts the postmaster and waits until it answers (dbWaitReadyTimeout).
    async fn start(&mut self) -> anyhow::Result<()> {
        if self.instance.postmaster.is_some() {
            return Ok(());
        }
        let db = self.db()?;
        self.prepare_dirs()?;
        // With minSynchronousStandbys 0 the sentinel drops a missing standby from the set:
        // normal users need not wait for it.
        let min_sync = self
            .view
            .cd
            .as_ref()
            .map_or(1, |cd| cd.cluster.spec.min_synchronous_standbys());
        let master_sync = db.spec.role == Some(control::model::DbRole::Master)
            && db.spec.synchronous_replication
            && !db.spec.synchronous_standbys.is_empty()
            && min_sync > 0;
        // Not over a standby's data: that one starts as a standby and is promoted, and
        // the master's configuration would make it a primary on the old timeline.
        let standby_data = self
            .settings
            .layout
            .pg_data()
            .join("standby.signal")
            .exists();
        if master_sync && !self.instance.restricted && !standby_data {
            // Until the sync standbys are back in sync, only superuser and replication.
            self.instance.restricted = true;
            self.write_config()?;
        }
        let pm = Postmaster::spawn(
            &self.settings.tools,
            &self.settings.layout.pg_data(),
            &self.settings.layout.log(),
        )?;
        if db.spec.role == Some(control::model::DbRole::Master) {
            // Armed before it can take a write: a keeper frozen right now must not leave
            // an unfenced master behind.
            self.arm_watchdog(pm.pid()).await;
        }
        self.instance.postmaster = Some(pm);
        self.instance.shutdown_checkpoint = None;
        let timeout = self
            .view
            .cd
            .as_ref()
            .map(|cd| cd.cluster.spec.db_wait_ready_timeout().as_std())
            .unwrap_or(Duration::from_secs(60));
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self
                .instance
                .postmaster
                .as_mut()
                .is_some_and(|p| p.has_exited())
            {
                self.instance.postmaster = None;
                bail!(
                    "PostgreSQL exited during start (see {})",
                    self.settings.layout.log().display()
                );
            }
            if let Ok(client) = self.conn().connect(Duration::from_secs(1)).await {
                if db.spec.init_mode == Some(DbInitMode::New)
                    || db.spec.role == Some(control::model::DbRole::Master)
                {
                    let in_recovery: bool = client
                        .query_one("SELECT pg_is_in_recovery()", &[])
                        .await?
                        .get(0);
                    if !in_recovery {
                        sql::ensure_repl_role(
                            &client,
                            &self.settings.local.repl_user,
                            self.settings.repl_password.as_deref(),
                        )
                        .await?;
                        self.ensure_auth_role(&client).await?;
                    }
                }
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("PostgreSQL did not accept connections within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn promote(&mut self) -> anyhow::Result<()> {
        self.wait_proxies_before_promotion().await;
        let session = self.session(Duration::from_secs(2)).await?;
        let done = self.promote_on(session.client()).await;
        self.give_back(session, done.is_ok());
        if done.is_ok() {
            // What this round publishes with its convergence must be the promoted state:
            // the sentinel and the standbys take a converged master's timeline as proof
            // (`Db::forks_standby`), and the state observed before the promotion has the
            // old one.
            self.query_state().await;
        }
        done
    }

    async fn promote_on(&self, client: &tokio_postgres::Client) -> anyhow::Result<()> {
        self.arm_watchdog(self.instance.postmaster.as_ref().and_then(|p| p.pid()))
            .await;
        let started = tokio::time::Instant::now();
        if !sql::promote(client, Duration::from_secs(60)).await? {
            bail!("promotion did not finish within 60 s");
        }
        let promote = started.elapsed();
        // The control file names the new timeline only after a checkpoint; pg_rewind on the
        // old master reads it and would otherwise find "no rewind required".
        client.batch_execute("CHECKPOINT").await?;
        let checkpoint = started.elapsed() - promote;
        tracing::debug!(?promote, ?checkpoint, "promoted");
        sql::ensure_repl_role(
            client,
            &self.settings.local.repl_user,
            self.settings.repl_password.as_deref(),
        )
        .await?;
        self.ensure_auth_role(client).await?;
        Ok(())
    }

    /// The proxy's auth role and lookup function, when `--pg-auth-username` is set.
    async fn ensure_auth_role(&self, client: &tokio_postgres::Client) -> anyhow::Result<()> {
        if let Some((user, password)) = &self.settings.auth {
            sql::ensure_auth_role(client, user, password)
                .await
                .with_context(|| {
                    format!("cannot create the auth role {user} and its lookup function")
                })?;
        }
        Ok(())
    }

    /// Slots for this master's followers and the spec's extra ones; stale `stolon_*` go.
    async fn sync_slots(&mut self) -> anyhow::Result<()> {
        let db = self.db()?;
        if self.instance.state.is_none() {
            return Ok(());
        }
        // The db spec's followers, whatever the role, as Go stolon: a standby cluster's master
        // is in recovery and its cascading standbys need their slots there. The sentinel gives
        // an ordinary standby no followers, so it keeps no stolon_ slot (one left from its
        // time as a master would hold WAL forever).
        let mut wanted: Vec<String> = db.spec.followers.iter().map(|f| slot_name(f)).collect();
        // As stolon does: the spec's extra slots are managed under the stolon_ prefix, so
        // one removed from the spec is dropped like any stale stolon_ slot, and slots users
        // made themselves are never touched.
        wanted.extend(
            db.spec
                .additional_replication_slots
                .iter()
                .map(|s| slot_name(s)),
        );
        let session = self.session(Duration::from_secs(2)).await?;
        let done = sql::sync_slots(session.client(), &wanted).await;
        self.give_back(session, done.is_ok());
        Ok(done?)
    }
}

/// pg_basebackup's `--create-slot` failed because the master already has the slot (a copy
/// that failed half-way, or a slot the master's keeper made first). pg_basebackup reports it
/// only as text on stderr (no SQLSTATE, exit code 1 for every failure), so this matches the
/// server's exact message for this slot, as PostgreSQL 13 to 17 word it:
/// `ERROR:  replication slot "<slot>" already exists`.
pub(crate) fn slot_already_exists(stderr: &str, slot: &str) -> bool {
    stderr.contains(&format!("replication slot \"{slot}\" already exists"))
}

#[cfg(test)]
mod tests {
    use super::slot_already_exists;
    use std::process::Command;

    /// The exact stderr of this machine's pg_basebackup against a real PostgreSQL that
    /// already has the slot: recognised for that slot only, and other failures are not.
    #[test]
    fn pg_basebackup_slot_exists_is_told_from_other_failures() {
        let pg = testkit::Postgres::start(&[]).expect("postgres");
        let port = pg.port().to_string();
        let server = ["-h", "127.0.0.1", "-p", port.as_str(), "-U", "postgres"];
        let tool = |name: &str| Command::new(testkit::postgres::pg_bin_dir().join(name));
        let psql = tool("psql")
            .args(server)
            .args([
                "-Atc",
                "select pg_create_physical_replication_slot('stolon_abc')",
            ])
            .output()
            .expect("psql");
        assert!(psql.status.success(), "{psql:?}");
        let basebackup = |slot: &str| {
            let dest = tempfile::tempdir().expect("tempdir");
            let out = tool("pg_basebackup")
                .args(server)
                .args(["-X", "stream", "-w", "--create-slot"])
                .arg(format!("--slot={slot}"))
                .arg("-D")
                .arg(dest.path().join("data"))
                .output()
                .expect("pg_basebackup");
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        };
        let (ok, stderr) = basebackup("stolon_abc");
        assert!(!ok);
        assert!(slot_already_exists(&stderr, "stolon_abc"), "{stderr}");
        assert!(!slot_already_exists(&stderr, "stolon_ab"), "{stderr}");
        let (ok, stderr) = basebackup("bad-name");
        assert!(!ok);
        assert!(!slot_already_exists(&stderr, "bad-name"), "{stderr}");
    }
}
